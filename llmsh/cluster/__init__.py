"""llmsh.cluster"""
