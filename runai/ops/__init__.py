"""Operations: metrics, health, idle unload."""
