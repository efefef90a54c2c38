"""Ways frames come in for a stream besides WebRTC (api.webrtc): WebSocket ingest."""
