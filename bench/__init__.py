# Benchmarks (run as scripts: `.venv/bin/python bench/<name>.py`); run_all.py is `make bench`.
