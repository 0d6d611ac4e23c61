"""llmsh.protocol"""
