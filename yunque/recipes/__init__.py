"""One plain function per pipeline stage; the CLI calls these, nothing imports them."""
