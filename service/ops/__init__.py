"""Operations: metrics, HTTP endpoints, logging."""
