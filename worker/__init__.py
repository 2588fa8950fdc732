"""Generation workers: take jobs from Redis, run a model, append its tokens to the message."""
