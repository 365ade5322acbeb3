"""Getting models off the disk: safe checkpoint reading and verification (every tensor by name and
shape before any is read), the model holder that builds each network on first use, and the tiny
random demo model written in the same single-file layout as a real checkpoint."""
