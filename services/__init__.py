"""triage service: Kafka in, vLLM student (+ teacher) in the middle, Kafka out."""
