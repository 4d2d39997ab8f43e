"""The tinkerq web API (Flask). `create_app()` is defined in app.factory."""
