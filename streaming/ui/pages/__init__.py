"""One router per page of the console; `app.create_app` mounts every module listed in PAGES."""

PAGES = ("devices", "events", "timeline", "queries", "search")
