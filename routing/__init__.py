"""The data plane: the OpenAI-compatible gateway and the router."""
