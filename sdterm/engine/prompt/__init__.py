"""From the text the user typed to token ids: the CLIP tokenizer, where its files are found, and
AUTOMATIC1111-style chunking of long prompts into 75-token windows."""
