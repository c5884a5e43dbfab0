"""Live agent response streaming for Django over Channels."""
