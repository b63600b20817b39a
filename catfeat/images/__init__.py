"""Reading images: listing a folder (names, labels, layout), decoders, and the thread / process readers."""
