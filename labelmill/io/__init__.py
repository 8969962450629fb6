"""Input: WebDataset shard listing and reading, image decoding."""
