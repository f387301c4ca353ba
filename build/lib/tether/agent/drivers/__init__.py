"""Runtime drivers: one small interface (:class:`base.Driver`), several implementations."""
