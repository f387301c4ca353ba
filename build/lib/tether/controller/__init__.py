"""The Tether controller: state store, scheduler and the MQTT service around them."""
