"""The Textual front end. Nothing here is imported by the engine."""
