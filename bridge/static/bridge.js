/* placeholder: landing-page snippet */
