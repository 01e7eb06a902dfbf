# Docker images; included by the Makefile (which defines PY and VENV_STAMP).
#
#   make docker                                   # mnist-job:cpu (= :latest) and :cuda
#   make docker EXTRA_CA_CERTS=/path/to/ca-bundle.pem            # TLS-inspecting proxy
#   make docker BASE_IMAGE=python:3.11-slim-bookworm             # this base, no fallback
#   make docker-test                              # the docker tests, on the built images
#
# The base: BASE_IMAGE if given (with a tag or digest); else the official
# python:3.11-slim-bookworm when it is here or can be pulled, and where no
# registry answers, mnist-job-base:bookworm built from the Debian archive
# (docker/base-image.sh decides, once per make run, and says so).
# EXTRA_CA_CERTS (also read from the environment) changes the dependency layer:
# pass the same value every time, or that layer, the CUDA image's 3.4 GB
# download included, is rebuilt.

IMAGE ?= mnist-job
BASE_IMAGE ?=
LOCAL_BASE_IMAGE ?= mnist-job-base:bookworm
DOCKER_PULL_TIMEOUT ?= 60
EXTRA_CA_CERTS ?=
FETCH_DATA ?= 1
PRUNE ?= 1
DOCKER ?= docker
DOCKER_BUILD_FLAGS ?=

# OCI labels. A remote URL loses any credentials before it goes into a label.
IMAGE_VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_REVISION ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
IMAGE_SOURCE ?= $(shell git config --get remote.origin.url 2>/dev/null | sed -E 's#//[^/@]*@#//#')

DOCKER_CA_FILE := docker/extra-ca-certs/make-extra-ca.crt
# The base image docker-base-image chose for this run (build/ is not in git).
DOCKER_BASE_FILE := build/docker-base-image

.PHONY: docker docker-cpu docker-cuda docker-base docker-base-image docker-test docker-ls docker-ca-certs

# $(1): the TensorFlow extra (cpu|cuda); $(2): the tags to give the image.
define docker_build
	@start=$$(date +%s); \
	$(DOCKER) build -f docker/Dockerfile $(DOCKER_BUILD_FLAGS) \
	  --build-arg BASE_IMAGE="$$(cat $(DOCKER_BASE_FILE))" \
	  --build-arg TF_EXTRA=$(1) \
	  --build-arg FETCH_DATA=$(FETCH_DATA) \
	  --build-arg PRUNE=$(PRUNE) \
	  --build-arg VERSION=$(IMAGE_VERSION) \
	  --build-arg REVISION=$(IMAGE_REVISION) \
	  --build-arg SOURCE=$(IMAGE_SOURCE) \
	  $(foreach tag,$(2),--tag $(IMAGE):$(tag)) . \
	&& echo "docker: built $(foreach tag,$(2),$(IMAGE):$(tag)) in $$(( $$(date +%s) - start )) s" \
	&& $(DOCKER) image ls $(IMAGE):$(firstword $(2))
endef

docker: docker-cpu docker-cuda ## Build both images: mnist-job:cpu (also :latest) and mnist-job:cuda

docker-cpu: docker-ca-certs docker-base-image ## Build mnist-job:cpu and :latest (BASE_IMAGE=, EXTRA_CA_CERTS=)
	$(call docker_build,cpu,cpu latest)

docker-cuda: docker-ca-certs docker-base-image ## Build mnist-job:cuda (tensorflow[and-cuda], ~3.4 GB download)
	$(call docker_build,cuda,cuda)

docker-base: ## Build mnist-job-base:bookworm from the Debian archive (no registry needed; root)
	scripts/build-base-image.sh $(LOCAL_BASE_IMAGE)

# Which base this run builds on: docker/base-image.sh, once for both images.
docker-base-image:
	@mkdir -p $(dir $(DOCKER_BASE_FILE))
	@LOCAL_BASE_IMAGE=$(LOCAL_BASE_IMAGE) DOCKER_PULL_TIMEOUT=$(DOCKER_PULL_TIMEOUT) \
	  docker/base-image.sh "$(BASE_IMAGE)" >$(DOCKER_BASE_FILE).tmp
	@mv $(DOCKER_BASE_FILE).tmp $(DOCKER_BASE_FILE)

docker-test: $(VENV_STAMP) ## Run the docker-marked tests on the built images (make docker first)
	IMAGE=$(IMAGE) $(PY) -m pytest -m docker $(PYTEST_ARGS)

docker-ls: ## Show the images and their sizes
	@$(DOCKER) image ls $(IMAGE)

# Stages EXTRA_CA_CERTS (a PEM file) in the build context, or removes what an
# earlier make staged; certificates you put in docker/extra-ca-certs/ stay.
docker-ca-certs:
ifneq ($(strip $(EXTRA_CA_CERTS)),)
	@test -f "$(EXTRA_CA_CERTS)" || { echo "EXTRA_CA_CERTS=$(EXTRA_CA_CERTS): no such file" >&2; exit 1; }
	@cmp -s "$(EXTRA_CA_CERTS)" $(DOCKER_CA_FILE) || install -m 644 "$(EXTRA_CA_CERTS)" $(DOCKER_CA_FILE)
else
	@rm -f $(DOCKER_CA_FILE)
endif
