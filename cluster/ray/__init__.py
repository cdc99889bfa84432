"""Ray: the one place that starts or joins it, Ray Train launch, job submission."""
