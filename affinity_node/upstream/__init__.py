"""The client side of the proxy: the only code that talks HTTP to backends."""
