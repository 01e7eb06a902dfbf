# Kubernetes manifests; included by the Makefile (which defines PY, VENV and
# VENV_STAMP). No cluster needed: the schemas ship with kubernetes-validate and
# the docker tests run the pod templates as a kubelet would (tests/kubelet.py).
#
#   make k8s-validate                       # schemas + yamllint, offline
#   make k8s-validate K8S_VERSIONS=1.33.0   # against another Kubernetes
#   make k8s-test                           # tests/test_k8s.py, docker ones included

K8S_DIR := k8s
K8S_MANIFESTS := $(wildcard $(K8S_DIR)/*.yaml)
# Oldest supported (podFailurePolicy is GA from 1.31) and the validator's newest.
K8S_VERSIONS ?= 1.31.0 latest

.PHONY: k8s-validate k8s-test

k8s-validate: $(VENV_STAMP) ## Check k8s/*.yaml against the Kubernetes schemas and yamllint (offline)
	@set -e; for version in $(K8S_VERSIONS); do \
	  if [ "$$version" = latest ]; then version=$$($(PY) -c 'import kubernetes_validate as k; print(k.latest_version())'); fi; \
	  $(VENV)/bin/kubernetes-validate --strict --quiet -k $$version $(K8S_MANIFESTS); \
	  echo "k8s: $(words $(K8S_MANIFESTS)) manifests valid for Kubernetes $$version"; \
	done
	$(VENV)/bin/yamllint --strict $(K8S_DIR)

k8s-test: $(VENV_STAMP) ## Run the Kubernetes tests (docker ones need the images: make docker)
	$(PY) -m pytest tests/test_k8s.py $(PYTEST_ARGS)
