"""llmsh.runtime"""
