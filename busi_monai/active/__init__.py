"""Active learning: the selection strategies the app offers, and the simulation that measures them."""
