"""Layer 5: tools the node serves to tasks (built-ins and sandboxed MCP servers), each call
checked, limited, classified and recorded."""
