"""fetchpool: a gRPC fetch service over one pooled HTTP/2 httpx client."""
