"""Pure domain core: no I/O, no clock, no environment; everything here is a function of its arguments."""
