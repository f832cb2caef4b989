"""The network edge: one port for the websocket API, the HTTP routes and the web page.

``app.py`` wires and runs the server; ``websocket.py`` receives frames and dispatches events;
``http.py`` answers the HTTP routes; ``auth.py`` authenticates tenants and checks origins.
"""
