# Kubernetes manifests; included by the Makefile (which defines PY, VENV and
# VENV_STAMP). No cluster needed: the schemas ship with kubernetes-validate and
# the docker tests run the pod templates as a kubelet would (tests/kubelet.py).
#
#   make k8s-validate                       # schemas, CRDs, yamllint, policy scan; offline
#   make k8s-validate K8S_VERSIONS=1.33.0   # against another Kubernetes
#   make k8s-validate K8S_CRDS=DIR          # JobSet/Trainer CRDs of your versions
#   make k8s-test                           # tests/test_k8s.py, docker ones included

K8S_DIR := k8s
K8S_MANIFESTS := $(wildcard $(K8S_DIR)/*.yaml $(K8S_DIR)/trainer/*.yaml)
# The CRDs of JobSet and Kubeflow Trainer (their repositories' CRD files, for
# the versions your cluster runs), to check the custom resources against.
K8S_CRDS ?= ../shared/crds
# The policy scanner (checkov) lives in its own venv: its pins are not the job's.
POLICY_VENV := .venv-policy
POLICY_STAMP := $(POLICY_VENV)/.installed
# Oldest supported (podFailurePolicy is GA from 1.31) and the validator's newest.
K8S_VERSIONS ?= 1.31.0 latest

.PHONY: k8s-validate k8s-test

$(POLICY_STAMP): requirements/policy.txt
	$(PYTHON) -m venv $(POLICY_VENV)
	$(POLICY_VENV)/bin/pip install --quiet --require-hashes --no-deps -r requirements/policy.txt
	touch $@

k8s-validate: $(VENV_STAMP) $(POLICY_STAMP) ## Check k8s/ offline: Kubernetes schemas, CRDs (K8S_CRDS), yamllint, checkov
	@rm -rf build/k8s-jobs
	$(PY) scripts/k8s_validate.py --crds $(K8S_CRDS) --versions $(K8S_VERSIONS) \
	  --emit-jobs build/k8s-jobs $(K8S_MANIFESTS)
	$(VENV)/bin/yamllint --strict $(K8S_DIR)
	$(POLICY_VENV)/bin/checkov --config-file .checkov.yaml \
	  --directory $(K8S_DIR) --directory build/k8s-jobs

k8s-test: $(VENV_STAMP) ## Run the Kubernetes tests (docker ones need the images: make docker)
	$(PY) -m pytest tests/test_k8s.py $(PYTEST_ARGS)
