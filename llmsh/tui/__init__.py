"""llmsh.tui"""
