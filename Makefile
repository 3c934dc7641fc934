# Developer shortcuts; each target calls the scripts the README documents.
.PHONY: sandbox test unit lint bench bench-quick bench-clusterip bench-nodeport bench-sockmap bench-redirect bench-tproxy bench-progcost setup clean

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

# veer side by side with kube-proxy (iptables, nftables) and the direct path:
# bench/results/compare-<time>.md, .json and .png. Needs the Kubernetes
# binaries (scripts/build-k8s.sh: cached, tens of minutes the first time).
bench: setup k8s
	.venv/bin/python bench/compare.py

bench-quick: setup k8s
	.venv/bin/python bench/compare.py --quick

k8s:
	./scripts/build-k8s.sh

bench-clusterip: setup
	.venv/bin/python bench/clusterip.py

bench-nodeport: setup
	.venv/bin/python bench/nodeport.py

bench-sockmap: setup
	.venv/bin/python bench/sockmap.py

bench-redirect: setup
	.venv/bin/python bench/redirect.py

bench-tproxy: setup
	.venv/bin/python bench/tproxy.py

# veer's programs' cost per connection on the socket path (kernel BPF stats).
bench-progcost: setup k8s
	.venv/bin/python bench/progcost.py

clean:
	rm -rf .venv .mypy_cache .ruff_cache build *.egg-info
