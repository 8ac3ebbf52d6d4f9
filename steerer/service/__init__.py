"""The gRPC service: scheduler (continuous batching over one `Steerer`), servicer, server, client, metrics.

Importing this package is cheap; the generated protobuf code is built on first use of `steerer.service.proto`.
"""
