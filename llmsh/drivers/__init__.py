"""llmsh.drivers"""
