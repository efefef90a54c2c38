"""Workers: connect to a relay, run an engine on each channel's newest frame."""
