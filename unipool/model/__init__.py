"""The model: its config, the decoder, the routers and the expert pools. No I/O, no distributed code."""
