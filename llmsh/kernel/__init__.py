"""llmsh.kernel"""
