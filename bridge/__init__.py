"""postback-bridge: relays tracker S2S postbacks to the TikTok Events API."""

__version__ = "0.1.0"
