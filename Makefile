# The two commands a reader needs first:
#   make demo   local control plane + two operator replicas + both example clusters
#   make test   every check and test, against a real local control plane
.PHONY: test demo demo-down build crd bench

test:
	e2e/test

demo:
	e2e/demo up

demo-down:
	e2e/demo down

build:
	cargo build --locked --release

# The benchmarks of SPEC §7; rewrites BENCHMARKS.md (about an hour on 2 cores).
bench:
	e2e/bench

# Regenerate the CRD files from the Rust types (a test fails when they drift).
crd:
	cargo run --quiet -- crd > crds/cluster_crd.yaml
	cp crds/cluster_crd.yaml deploy/cluster_crd.yaml
	cp crds/cluster_crd.yaml kustomize/crd/cluster_crd.yaml
	cp crds/cluster_crd.yaml helm/ray-operator/crds/cluster_crd.yaml
