"""The users directory: who has called the API, as their tokens named them."""
