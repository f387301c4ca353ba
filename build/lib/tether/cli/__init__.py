"""The operator CLI, ``tether``: talks to the controller over MQTT request/response."""
