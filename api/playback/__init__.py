"""Ways a stream's output goes out besides WebRTC: MJPEG, and RTMP/HLS output processes."""
