"""The Keystile proxy: application, relay, admin routes, errors and config."""
