"""The command table: every command that needs ``bpy``, by name, in ``commands.HANDLERS`` (which
``commands.dispatch`` runs on Blender's main thread). ``commands`` defines the core ones; this module adds
those of the modules built on it, so that none of them imports another in a circle. ``service`` imports it
before it starts a service.
"""

from __future__ import annotations

from . import api_lookup, commands, datablocks, export, scene, views

commands.HANDLERS.update(
    {
        "get_scene_info": scene.get_scene_info,
        "get_object_info": scene.get_object_info,
        "export_scene": export.export_scene,
        "look": views.look,
        "lookup_bpy_api": api_lookup.lookup_bpy_api,
        "get_material_info": datablocks.get_material_info,
        "get_collection_info": datablocks.get_collection_info,
        "list_datablocks": datablocks.list_datablocks,
    }
)
commands.AFTER_CHANGES.append(datablocks.note_changes)
