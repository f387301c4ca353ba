"""The Tether device agent: observe -> plan -> apply -> report, online or not."""
