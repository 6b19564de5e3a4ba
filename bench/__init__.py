"""tapper's benchmark suite (bench/README.md): `python -m bench` lists it, `python -m bench NAME` runs one."""
