from . import write_demo_data

print(write_demo_data())
