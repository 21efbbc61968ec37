"""Object detection: YOLOv5 loss, boxes, NMS, COCO-style metrics and data."""
