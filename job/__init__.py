"""mnist-job: a production-grade MNIST training batch job."""

__version__ = "0.1.0"
