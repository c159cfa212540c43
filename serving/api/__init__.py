"""The API wing, the edge clients talk to: the ingress deployment (HTTP with the OpenAI schemas, gRPC), the
tolerant gRPC servicer functions Serve's proxy registers, and the errors clients are told."""
