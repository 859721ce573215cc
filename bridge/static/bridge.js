/* postback-bridge landing-page snippet: registers this visit's click with the bridge (/click) and
 * exposes the event_id the bridge will use, so the TikTok pixel and the server event deduplicate.
 *
 *   <script src="https://bridge.example.com/bridge.js" data-click-param="subid" async></script>
 *   ttq.track("Purchase", {value: 10, currency: "USD"}, {event_id: postbackBridge.eventId("Purchase")});
 *
 * data- attributes (all optional):
 *   data-click-param   URL parameter(s) holding the tracker's click id, comma-separated (default "subid")
 *   data-ttclid-param  URL parameter holding TikTok's click id (default "ttclid")
 *   data-event-id      event_id template, same as the tracker file's (default "{click_id}_{event}")
 *   data-pixel         pixel name or code for this page's conversions
 *   data-cookie-days   how long ttclid and click id are remembered (default 30)
 *   data-cookie-domain e.g. ".example.com" to share them across subdomains (default: this host only)
 *
 * No dependencies. The request is CORS-simple (a form-encoded POST, no custom headers), so the
 * browser sends no preflight; no cookies are sent to the bridge.
 */
(function () {
  "use strict";

  var CLICK_COOKIE = "pbb_click_id";
  var TTCLID_COOKIE = "pbb_ttclid";

  var script = document.currentScript || findScript();
  var data = (script && script.dataset) || {};
  var clickParams = (data.clickParam || "subid").split(",");
  var ttclidParam = data.ttclidParam || "ttclid";
  var template = data.eventId || "{click_id}_{event}";
  var pixel = data.pixel || "";
  var cookieDays = parseFloat(data.cookieDays || "30");
  var cookieDomain = data.cookieDomain || "";
  // Relative to the script's own URL, so a bridge behind a path prefix still works.
  var endpoint = script && script.src ? new URL("click", script.src).href : "";

  function findScript() {
    // `async` scripts have no currentScript in some browsers; find ourselves by name.
    var scripts = document.getElementsByTagName("script");
    for (var i = scripts.length - 1; i >= 0; i--) {
      if (/\/bridge\.js(\?|#|$)/.test(scripts[i].src)) return scripts[i];
    }
    return null;
  }

  function readCookie(name) {
    var parts = document.cookie ? document.cookie.split(";") : [];
    for (var i = 0; i < parts.length; i++) {
      var pair = parts[i].replace(/^\s+/, "");
      if (pair.indexOf(name + "=") === 0) {
        try {
          return decodeURIComponent(pair.slice(name.length + 1));
        } catch (e) {
          return null;
        }
      }
    }
    return null;
  }

  function writeCookie(name, value) {
    var cookie = name + "=" + encodeURIComponent(value) + "; Path=/; SameSite=Lax";
    cookie += "; Max-Age=" + Math.round((cookieDays > 0 ? cookieDays : 30) * 86400);
    if (cookieDomain) cookie += "; Domain=" + cookieDomain;
    if (location.protocol === "https:") cookie += "; Secure";
    document.cookie = cookie;
  }

  function fromUrl(names) {
    var query = new URLSearchParams(location.search);
    for (var i = 0; i < names.length; i++) {
      var value = query.get(names[i].replace(/^\s+|\s+$/g, ""));
      // An unsubstituted macro ("{subid}", "__CLICKID__") is not a click id.
      if (value && !/^\{[^{}]*\}$|^__[A-Z_]+__$/.test(value)) return value;
    }
    return null;
  }

  // The URL is the newest click; cookies carry it to the next pages of the funnel.
  var clickId = fromUrl(clickParams) || readCookie(CLICK_COOKIE);
  var ttclid = fromUrl([ttclidParam]) || readCookie(TTCLID_COOKIE);
  if (clickId) writeCookie(CLICK_COOKIE, clickId);
  if (ttclid) writeCookie(TTCLID_COOKIE, ttclid);

  function send(fields, beacon) {
    if (!endpoint || !clickId) return Promise.resolve(false);
    var body = new URLSearchParams();
    body.set("click_id", clickId);
    for (var name in fields) {
      if (Object.prototype.hasOwnProperty.call(fields, name) && fields[name]) body.set(name, fields[name]);
    }
    // sendBeacon survives the page being closed; fetch tells us whether the bridge took it.
    if (beacon && navigator.sendBeacon && navigator.sendBeacon(endpoint, body)) return Promise.resolve(true);
    if (window.fetch) {
      return fetch(endpoint, {method: "POST", body: body, keepalive: true, credentials: "omit", mode: "cors"})
        .then(function (response) { return response.ok; }, function () { return false; });
    }
    if (navigator.sendBeacon) return Promise.resolve(navigator.sendBeacon(endpoint, body));
    // Last resort for browsers with neither: a GET, whose query string ends up in proxies' access
    // logs, so identifiers are left out of it.
    ["email", "phone", "external_id"].forEach(function (name) { body.delete(name); });
    new Image().src = endpoint + "?" + body.toString();
    return Promise.resolve(true);
  }

  var sentTtp = readCookie("_ttp");
  var ready = send({
    ttclid: ttclid,
    ttp: sentTtp,
    pixel: pixel,
    url: location.href,
    referrer: document.referrer
  });

  // TikTok's pixel often sets _ttp after this script ran; send it before the visitor leaves.
  document.addEventListener("visibilitychange", function () {
    var ttp = readCookie("_ttp");
    if (document.visibilityState === "hidden" && ttp && ttp !== sentTtp) {
      sentTtp = ttp;
      send({ttp: ttp, pixel: pixel}, true);
    }
  });

  function eventId(event, extra) {
    if (!clickId || !event) return null;
    var fields = {click_id: clickId, event: event};
    for (var name in extra || {}) {
      if (Object.prototype.hasOwnProperty.call(extra, name)) fields[name] = String(extra[name]);
    }
    var missing = false;
    var id = template.replace(/\{(\w+)\}/g, function (_, name) {
      if (fields[name] === undefined) missing = true;
      return fields[name];
    });
    // A half-filled event_id would never match the server's, which is worse than none.
    return missing ? null : id;
  }

  window.postbackBridge = {
    clickId: clickId,
    ttclid: ttclid,
    // Resolves to true once the bridge has stored the click (false if it could not be reached).
    ready: ready,
    // The event_id the bridge sends for `event`; extra fields fill other template names.
    eventId: eventId,
    // Email, phone and external_id from a form; the bridge hashes them on arrival.
    identify: function (ids) {
      ids = ids || {};
      return send({email: ids.email, phone: ids.phone, external_id: ids.external_id, pixel: pixel});
    }
  };
})();
