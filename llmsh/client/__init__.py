"""llmsh.client"""
