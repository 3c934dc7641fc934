# Developer shortcuts; each target calls the scripts the README documents.
.PHONY: sandbox test unit lint bench bench-clusterip bench-nodeport bench-sockmap setup clean

setup:
	./scripts/setup.sh

sandbox:
	./scripts/sandbox

test:
	./scripts/test

unit: setup
	.venv/bin/pytest -q tests/unit

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

bench: bench-clusterip bench-nodeport

bench-clusterip: setup
	.venv/bin/python bench/clusterip.py

bench-nodeport: setup
	.venv/bin/python bench/nodeport.py

bench-sockmap: setup
	.venv/bin/python bench/sockmap.py

clean:
	rm -rf .venv .mypy_cache .ruff_cache build *.egg-info
