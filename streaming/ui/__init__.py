"""The web console: server-rendered pages over Redis alone (no Ray), live through server-sent events."""
